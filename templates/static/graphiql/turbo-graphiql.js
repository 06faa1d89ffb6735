// Turbo's GraphiQL page: queries and mutations over HTTP, subscriptions over this server's WebSocket
// (graphql-transport-ws). The browser's `sess` cookie signs both in; a token typed into the Headers tab
// as {"Authorization": "Bearer ..."} is used instead.
(function () {
  var here = window.location;
  var socketUrl = (here.protocol === "https:" ? "wss://" : "ws://") + here.host + here.pathname;
  var fetcher = GraphiQL.createFetcher({ url: here.pathname, subscriptionUrl: socketUrl });
  var root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(React.createElement(GraphiQL, { fetcher: fetcher, defaultEditorToolsVisibility: true }));
})();
