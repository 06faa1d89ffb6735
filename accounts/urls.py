from django.urls import path

from accounts import api, keys_web, web

urlpatterns = [
    path("user/signup", api.SignupView.as_view()),
    path("user/login", api.LoginView.as_view()),
    path("user/logout", api.LogoutView.as_view()),
    path("user/session", api.SessionView.as_view()),
    path("user/read", api.UserReadView.as_view()),
    path("user/update", api.UserUpdateView.as_view()),
    path("user/password/update", api.PasswordUpdateView.as_view()),
    path("user/keys/create", api.ApiKeyCreateView.as_view()),
    path("user/keys/list", api.ApiKeyListView.as_view()),
    path("user/keys/revoke", api.ApiKeyRevokeView.as_view()),
    path("api/users/register", api.RegisterView.as_view()),
    path("api/users/login", api.JwtLoginView.as_view()),
    # the web app's pages
    path("login", web.login_page),
    path("signup", web.signup_page),
    path("logout", web.logout_page),
    path("keys", keys_web.keys_page),
]
